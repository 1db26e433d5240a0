"""``python -m lightning_seqpar.consolidate CHECKPOINT_DIR OUTPUT.pt``: one fp32 state dict from a sharded DeepSpeed
checkpoint."""

from __future__ import annotations

import argparse
import sys

from lightning_seqpar.deepspeed_engine import consolidate_checkpoint


def main(argv: list[str] | None = None) -> int:
    """Command line of ``python -m lightning_seqpar.consolidate``; returns the exit status (0 on success).

    Raises:
        SystemExit: on bad arguments (argparse).
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightning_seqpar.consolidate",
        description="Merge the ZeRO shards of a checkpoint written by SeqParStrategy(zero_stage>0) into one fp32"
        " Lightning checkpoint file (state_dict, hyper_parameters and the rest Lightning saved, without optimizer"
        " states) that LightningModule.load_from_checkpoint reads. Runs in one process, on CPU.",
    )
    parser.add_argument("checkpoint_dir", help="the checkpoint directory Lightning wrote (holds checkpoint/)")
    parser.add_argument("output_file", help="where to write the consolidated state dict")
    parser.add_argument("--tag", default=None, help="tag sub-directory (default: 'latest', else 'checkpoint')")
    args = parser.parse_args(argv)
    state_dict = consolidate_checkpoint(args.checkpoint_dir, args.output_file, tag=args.tag)
    print(
        f"wrote {len(state_dict)} tensors ({sum(t.numel() for t in state_dict.values())} values) to {args.output_file}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
