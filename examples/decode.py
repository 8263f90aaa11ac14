"""The main job as a script: ``paradec decode`` (see ``paradec decode --help``).

    torchrun --nproc-per-node 4 examples/decode.py          # paradec-tiny, a held-out problem, 4 ranks
    python examples/decode.py --model PATH --prompt "..."   # one process, your checkpoint
"""

import sys

from paradec.cli import main

if __name__ == "__main__":
    sys.exit(main(["decode", *sys.argv[1:]]))
