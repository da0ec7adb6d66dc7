"""The teacher files are the only place where CFG of model outputs, prompt encoding and VAE decoding are written
(docs/teacher.md). The sources of ddg_models, ddg_losses, examples and tools are parsed and searched for

* an inline CFG combine ``a + s * (b - a)`` (either operand order) of the same ``a``,
* a VAE decode: ``<...vae...>.decode(...)``,
* a text-encoder call ``<...text_encoder...>(...)`` or a pipeline's ``encode_prompt(...)``,

outside guided_teacher.py, guided_sampling.py (its scheduler-step piece), prompt_encoder.py and vae_codec.py.
The detector is checked first on snippets that hold each pattern and on look-alikes that must pass.
"""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("ddg_models", "ddg_losses", "examples", "tools")
TEACHER_FILES = {"ddg_models/guided_teacher.py", "ddg_models/guided_sampling.py", "ddg_models/prompt_encoder.py",
                 "ddg_models/vae_codec.py"}
# (file, function) -> why the pattern there is not a second teacher.
REFERENCES = {
    ("examples/demo.py", "diffusers_flow_loop"): "diffusers' own loop, the reference the demo compares ddg with",
    ("examples/demo.py", "diffusers_step"): "diffusers' own CFG + step, the reference of the demo's timings",
    ("ddg_models/simple_mlp_adaln.py", "forward_with_cfg"): "MAR's original head, the reference layout the fused "
                                                           "SplitTokenDiffusionHead is tested against",
    ("examples/ddis/tiny_world.py", "shifted_domain"): "lo + (hi - lo) * x maps pixel intensities, not CFG",
}
TEXT_ENCODER = re.compile(r"text_encoders?(_\d+)?")


def _last_name(node) -> str:
    while isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Subscript):
        return _last_name(node.value)
    return ""


def _is_cfg(node) -> bool:
    """a + s * (b - a) or s * (b - a) + a, with the same a."""
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)):
        return False
    for base, scaled in ((node.left, node.right), (node.right, node.left)):
        if isinstance(scaled, ast.BinOp) and isinstance(scaled.op, ast.Mult):
            for diff in (scaled.left, scaled.right):
                if isinstance(diff, ast.BinOp) and isinstance(diff.op, ast.Sub) \
                        and ast.dump(diff.right) == ast.dump(base):
                    return True
    return False


def findings(source: str, path: str = "<snippet>"):
    """(path, line, function, what) of every pattern in ``source``."""
    tree = ast.parse(source)
    out = []

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        what = None
        if _is_cfg(node):
            what = "inline CFG combine"
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "decode" and "vae" in _last_name(func.value).lower():
                what = "VAE decode"
            elif isinstance(func, ast.Attribute) and func.attr == "encode_prompt":
                what = "encode_prompt call"
            elif TEXT_ENCODER.fullmatch(_last_name(func)):
                what = "text-encoder call"
        if what and (path, function) not in REFERENCES:
            out.append((path, node.lineno, function, what))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return out


def test_the_detector_finds_each_pattern_and_passes_look_alikes():
    hits = findings("""
def f(self, pipe, sd, vae, text_encoder_2, z, ids, u, c, s):
    a = u + s * (c - u)
    b = (c - u) * s + u
    d = sd.vae.decode(z / 0.18).sample
    e = vae.decode(z)
    h = text_encoder_2(ids)[0]
    k = self.text_encoder(ids, output_hidden_states=True)
    m = pipe.encode_prompt(prompt=["a"])
""")
    assert [h[3] for h in hits] == ["inline CFG combine"] * 2 + ["VAE decode"] * 2 + ["text-encoder call"] * 2 + [
        "encode_prompt call"]
    assert findings("""
def g(tokenizer, ids, x, y, s, text_encoder):
    a = x + s * (y - x.detach())          # a different base: not a CFG combine
    b = tokenizer.decode(ids)             # a tokenizer, not a VAE
    c = tokenizer.batch_decode(ids)
    d = text_encoder.config.hidden_size   # reading an attribute is not a call
    e = tiny_text_encoder(tokenizer)      # building one is not encoding
    f = text_encoder.resize_token_embeddings(8)
""") == []


def test_cfg_prompt_encoding_and_vae_decoding_live_in_the_teacher_files_only():
    found = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in TEACHER_FILES:
                continue
            found += findings(path.read_text(), rel)
    assert not found, ("CFG, prompt encoding and VAE decoding belong to the teacher files (GuidedTeacher, "
                       "PromptEncoder, VAECodec); found:\n" + "\n".join(f"  {p}:{n} in {f}(): {w}"
                                                                       for p, n, f, w in found))
