"""Converts SANA transformer checkpoints between diffusers, native NVlabs and orbax formats.

  python tools/convert.py diffusers-to-orbax SRC DST
  python tools/convert.py orbax-to-diffusers SRC DST
  python tools/convert.py sana-pth-to-orbax SRC.pth DST

The command line of `sana_jax.convert`; `--help` describes the commands and their options.
"""

import sys

from sana_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
