#!/usr/bin/env python
"""Launch a training campaign: ``python launch.py --arch vit --n 5`` (see --help)."""

import sys

from volclf.cli import main

if __name__ == "__main__":
    sys.exit(main())
