"""``dvis-trt configs``: the config names ``--config`` accepts, and what each resolves from.

Example::

    $ dvis-trt configs
    name          backbone       dataset           classes  queries  resolved from
    r50-ovis      ResNet-50      OVIS                   25      100  DVIS_DAQ/configs/dvis_daq/ovis/DAQ_Offline_R50.yaml
    ...

Needs no torch (the config reader is YAML only).
"""
from __future__ import annotations

import argparse
import json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dvis-trt configs``."""
    parser.add_argument("--json", action="store_true",
                        help="print the table as JSON (with the packaged file paths)")
    parser.add_argument("--show", default=None, metavar="NAME|CFG.yaml",
                        help="print the fully resolved config of one name or file as YAML")


def run(args: argparse.Namespace) -> int:
    """Print the table (or one resolved config). Returns 0. Raises DependencyError (one line)
    where the YAML reader (the export extra) is not installed."""
    from dvis_trt.runtime.extras import require

    require("yaml", "configs", " to read the packaged configs")
    from .named_configs import describe_all, load_named_config

    if args.show:
        print(load_named_config(args.show).dump_yaml(), end="")
        return 0
    rows = describe_all()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ("name", "backbone", "dataset", "classes", "queries", "resolved from")
    body = [(r["name"], r["backbone"], r["dataset"], str(r["classes"]), str(r["queries"]),
             str(r["resolved_from"])) for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    right = {3, 4}
    for row in [head] + body:
        print("  ".join(c.rjust(w) if i in right else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    print("use: dvis-trt export CHECKPOINT --config NAME -o BUNDLE/  (or --config your_official.yaml)")
    return 0
