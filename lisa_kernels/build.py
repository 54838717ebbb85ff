"""Build the native extension ahead of time: `python -m lisa_kernels.build`.

Prints where the library lives; exits 1 (with the reason) when it cannot be built, 2 when
LISA_KERNELS_NO_NATIVE forbids it.
"""
from __future__ import annotations

import argparse
import sys
import time

from lisa_kernels import _native


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lisa_kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    if _native.disabled_by_env():
        print(f"lisa_kernels: native build disabled by {_native._NO_NATIVE_ENV}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    ops = _native.load(verbose=args.verbose)
    if ops is None:
        print(f"lisa_kernels: native build FAILED: {_native.failure_reason()}", file=sys.stderr)
        return 1
    print(f"lisa_kernels: native host arena ready ({ops.build_info()}) in {_native.build_dir()} "
          f"[{time.perf_counter() - t0:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
