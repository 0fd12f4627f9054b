"""`python -m core.export RUN_DIR`: export a finished run and print what was verified."""
from __future__ import annotations

import argparse
import sys
import traceback

from core.errors import CoreError, exit_code
from core.export.pipeline import export_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.export",
                                description="Export a finished run to RUN_DIR/export/ (ONNX FP32 + INT8, verified).")
    p.add_argument("run_dir", help="a finished run folder (holds report.json, config.yaml, checkpoints/best.pt)")
    args = p.parse_args(argv)
    try:
        export = export_run(args.run_dir)
    except CoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_code(err)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("error: export failed (traceback above)", file=sys.stderr)
        return 1
    o, q = export["onnx"], export["int8"]
    print(f"onnx: max |Δlogit| {o['max_abs_diff']:.2e}, top-1 agreement {o['top1_agreement']:.4f}, "
          f"accuracy {o['accuracy']:.4f}, {o['bytes'] / 1e6:.2f} MB")
    if q.get("ok"):
        print(f"int8: accuracy {q['accuracy']:.4f} (drop {100 * q['accuracy_drop']:.2f} points), {q['bytes'] / 1e6:.2f} MB")
    else:
        print(f"int8: not produced: {q.get('error')}")
    return 0

