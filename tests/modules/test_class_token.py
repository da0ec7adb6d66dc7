"""ClassAlignmentTokens: tokens added as single words, only their embedding rows change under AdamW with
weight decay, gradient masking, clipping after backward, per-class training, save/load round trip, bad inputs."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ddg_models import ClassAlignmentTokens  # noqa: E402
from examples.common.tiny_text import build_word_tokenizer, tiny_text_encoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ("cat", "dog", "fox")


def text_stack(directory, seed=0):
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(("a",) + NAMES, directory)
    return tokenizer, tiny_text_encoder(tokenizer, hidden_size=16, layers=1, heads=2, projection_dim=16)


def encode(tokens, prompts):
    ids = tokens.tokenizer(prompts, padding="max_length", max_length=tokens.tokenizer.model_max_length,
                           return_tensors="pt").input_ids
    return tokens.text_encoder(ids)[0]


def train_step(tokens, lr=1e-1, weight_decay=0.5, classes=(0, 1, 2), clip=None):
    opt = torch.optim.AdamW(tokens.parameters(), lr=lr, weight_decay=weight_decay)
    loss = encode(tokens, tokens.prompts(list(classes))).pow(2).mean()
    loss.backward()
    norm = tokens.clip_grad_norm_(clip) if clip is not None else None
    opt.step()
    tokens.restore_frozen_rows()
    return norm


def test_tokens_are_single_words_initialised_from_a(tmp_path):
    tokenizer, encoder = text_stack(tmp_path)
    a_row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("a</w>")].detach().clone()
    tokens = ClassAlignmentTokens(tokenizer, encoder, NAMES)
    assert tokens.prompt(1) == "a <cat-1> dog"
    ids = tokenizer(tokens.prompt(1)).input_ids
    assert ids[2] == tokens.token_ids[1] and len(ids) == 5  # <bos> a <cat-1> dog <eos>
    for row in tokens.learned_embeddings():
        torch.testing.assert_close(row, a_row)
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("embeddings.token_embedding.weight")


def test_only_token_rows_change(tmp_path):
    tokenizer, encoder = text_stack(tmp_path)
    tokens = ClassAlignmentTokens(tokenizer, encoder, NAMES)
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    train_step(tokens)
    grad = tokens.embedding_weight.grad
    assert set(torch.nonzero(grad.abs().sum(1)).flatten().tolist()) == set(tokens.token_ids)
    for name, p in encoder.named_parameters():
        if name.endswith("token_embedding.weight"):
            changed = torch.nonzero((p - before[name]).abs().sum(1)).flatten().tolist()
            assert set(changed) == set(tokens.token_ids)  # weight decay on the other rows was undone
        else:
            torch.testing.assert_close(p, before[name], rtol=0, atol=0)


def test_without_restore_weight_decay_would_touch_frozen_rows(tmp_path):
    # The reason restore_frozen_rows exists: AdamW decays rows whose gradient is zero.
    tokenizer, encoder = text_stack(tmp_path)
    tokens = ClassAlignmentTokens(tokenizer, encoder, NAMES)
    before = tokens.embedding_weight.detach().clone()
    opt = torch.optim.AdamW(tokens.parameters(), lr=1e-1, weight_decay=0.5)
    encode(tokens, tokens.prompts([0])).sum().backward()
    opt.step()
    assert not torch.equal(tokens.embedding_weight[0], before[0])
    tokens.restore_frozen_rows()
    torch.testing.assert_close(tokens.embedding_weight[0], before[0], rtol=0, atol=0)


def test_set_trainable_holds_other_classes(tmp_path):
    tokenizer, encoder = text_stack(tmp_path)
    tokens = ClassAlignmentTokens(tokenizer, encoder, NAMES)
    train_step(tokens, classes=(0,))
    learned = tokens.learned_embeddings()
    tokens.set_trainable([1])
    train_step(tokens, classes=(0, 1))
    after = tokens.learned_embeddings()
    torch.testing.assert_close(after[0], learned[0], rtol=0, atol=0)
    torch.testing.assert_close(after[2], learned[2], rtol=0, atol=0)
    assert not torch.equal(after[1], learned[1])


def test_clipping_after_backward_is_effective(tmp_path):
    tokenizer, encoder = text_stack(tmp_path)
    tokens = ClassAlignmentTokens(tokenizer, encoder, NAMES)
    encode(tokens, tokens.prompts([0, 1, 2])).pow(2).sum().mul(100).backward()
    norm = tokens.clip_grad_norm_(1e-3)
    assert float(norm) > 1e-3
    assert float(tokens.embedding_weight.grad.norm()) == pytest.approx(1e-3, rel=1e-3)


def test_save_load_round_trip(tmp_path):
    tokenizer, encoder = text_stack(tmp_path / "a")
    tokens = ClassAlignmentTokens(tokenizer, encoder, NAMES)
    train_step(tokens)
    tokens.save_pretrained(tmp_path / "tokens")
    tokenizer2, encoder2 = text_stack(tmp_path / "b")  # same seed: the same base text encoder
    loaded = ClassAlignmentTokens.from_pretrained(tmp_path / "tokens", tokenizer2, encoder2)
    assert loaded.tokens == tokens.tokens and loaded.prompt(2) == tokens.prompt(2)
    torch.testing.assert_close(loaded.learned_embeddings(), tokens.learned_embeddings(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(encode(loaded, loaded.prompts([0, 2])), encode(tokens, tokens.prompts([0, 2])))


def test_bad_inputs(tmp_path):
    tokenizer, encoder = text_stack(tmp_path)
    with pytest.raises(ValueError, match="ClassAlignmentTokens.*class_names"):
        ClassAlignmentTokens(tokenizer, encoder, [])
    with pytest.raises(ValueError, match="ClassAlignmentTokens.*token_format"):
        ClassAlignmentTokens(tokenizer, encoder, NAMES, token_format="<same>")
    with pytest.raises(ValueError, match="ClassAlignmentTokens.*initializer"):
        ClassAlignmentTokens(tokenizer, encoder, NAMES, initializer="a cat")
    with pytest.raises(ValueError, match="vocabulary"):  # 'fox' is a word already: prompts would change meaning
        ClassAlignmentTokens(tokenizer, encoder, ["x"], token_format="fox")
    tokens = ClassAlignmentTokens(tokenizer, encoder, NAMES)
    with pytest.raises(ValueError, match="prompt.*class_index"):
        tokens.prompt(3)
    with pytest.raises(ValueError, match="max_norm"):
        tokens.clip_grad_norm_("1")
    with pytest.raises(ValueError, match="set_trainable"):
        tokens.set_trainable([5])
    with pytest.raises(FileNotFoundError, match="from_pretrained"):
        ClassAlignmentTokens.from_pretrained(tmp_path / "missing", tokenizer, encoder)
