"""Convert a pickled weights file to a safe one: tensors only, no code on load.

    python tools/convert_checkpoint.py pretrain.pth pretrain_weights.pth --trust-pickle
    python tools/convert_checkpoint.py pretrain.pth pretrain.safetensors --trust-pickle

Some official checkpoints pickle Python objects besides their tensors (a config object, an
argparse namespace), and unpickling such a file runs whatever code it names. PointCLoRA
refuses them by default. Run this once, knowingly, on a file whose source you trust: it is
read in full (`--trust-pickle` is required, as a reminder) and its tensors are written to
OUT, which every PointCLoRA loader then reads without unpickling anything.

OUT ending in `.safetensors` is written with safetensors (a flat dict of tensors); any other
name as a weights-only torch file `{"base_model": state_dict}` (the official container, so
it loads as `model.pretrained`). An existing OUT is never replaced.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pointclora  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

# isort: split
import torch

from pointclora.config import TRUST_PICKLE_WARNING
from pointclora.engine.rundir import check_output_file
from pointclora.models.checkpoint import read_state_dict


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="the pickled checkpoint to read")
    parser.add_argument("out", type=Path, help="file to write (.safetensors or a torch file)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="required: you trust SRC enough to unpickle it in full")
    return parser.parse_args(argv)


def convert(src: Path, out: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read `src` (unpickled in full only with `trust_pickle`), write its tensors to `out`."""
    check_output_file(out, what="output", hint="choose a new file name")
    state = read_state_dict(src, trust_pickle=trust_pickle)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out), metadata={"converted_from": src.name})
    else:
        torch.save({"base_model": state}, out)
    return state


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.trust_pickle:
        print(f"error: reading {args.src} in full runs any code it holds; if you trust where it "
              "comes from, pass --trust-pickle", file=sys.stderr)
        return 2
    print(TRUST_PICKLE_WARNING, file=sys.stderr)
    try:
        state = convert(args.src, args.out, trust_pickle=True)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(state)} tensors to {args.out} (safe to load: tensors only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
