"""python -m benchmarks <family> [options]: a module benchmark through ddg_ops.bench's harness."""
from ddg_ops.bench.__main__ import main

# Family name -> module, the protocol of ddg_ops.bench's families.
FAMILIES = {"split_token_head": "benchmarks.split_token_head"}

if __name__ == "__main__":
    main(families=FAMILIES, prog="python -m benchmarks")
