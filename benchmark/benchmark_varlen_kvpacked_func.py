"""``benchmark_func.py --varlen --packing kvpacked`` (the script ring-flash-attn users know by this name); other flags pass through."""

import sys

from benchmark_func import main

if __name__ == "__main__":
    sys.argv[1:1] = "--varlen --packing kvpacked".split()
    main()
