"""`recdistill teacher`: train the teacher in this process, or size it with --dry-run.

    recdistill teacher --dry-run --config configs/teacher/7b.yaml --world-size 8
    recdistill teacher --dry-run --preset 24b --world-size 64 --gpu-mem-gib 80     # fits? with the sharding plan
    recdistill teacher --config configs/teacher/tiny.yaml                 # one process (1-rank gloo)
    torchrun --nproc_per_node=2 -m recdistill.train.teacher --config configs/teacher/tiny.yaml   # several ranks
"""

from __future__ import annotations

import json

from recdistill.config import add_config_arguments, config_from_args
from recdistill.train.dryrun import dry_run, print_report


def run_teacher(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """`recdistill teacher`: train (this process; use torchrun for several ranks) or, with --dry-run, size."""
    if args.preset:
        args.overrides = [f"teacher.preset={args.preset}", *args.overrides]
    cfg = config_from_args(args)
    if not args.dry_run:
        from recdistill.train.teacher import main as train_main

        argv = [a for c in args.config or [] for a in ("--config", c)] + [a for s in args.overrides
                                                                          for a in ("--set", s)]
        return train_main(argv)
    from recdistill.data.roles import roles_for
    from recdistill.data.source import build_source

    source = build_source(cfg.data)
    report = dry_run(cfg, source.schema, args.world_size, roles_for(cfg.data.roles, source, "teacher"),
                     gpu_mem_gib=args.gpu_mem_gib)
    print(json.dumps(report) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_report(report)
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill teacher`."""
    p = sub.add_parser("teacher", help="train the teacher in this process (torchrun -m recdistill.train.teacher for "
                       "several ranks), or size it with --dry-run")
    add_config_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="build on the meta device and print sizes, no training")
    p.add_argument("--world-size", type=int, default=8, help="GPUs for the ZeRO memory estimate")
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="with --dry-run: say whether the preset fits "
                   "--world-size GPUs of this memory (model states, activations, embeddings; the sharding plan)")
    p.add_argument("--preset", default=None, help="teacher preset (configs/teacher/<preset>.yaml), as "
                   "--set teacher.preset=<preset>")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run_teacher)
