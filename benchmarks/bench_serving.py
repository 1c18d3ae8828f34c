"""Generated tokens/s with fastpeft.AdapterBank for 1, 8 and 64 distinct tenants in batches of 64 rows,
vs one shared tenant and vs PEFT serving the same requests grouped by adapter; a mixed batch of 8 T5 tenants vs PEFT
one tenant at a time; plus the decode kernel's achieved bandwidth against the measured device-copy bandwidth.

    python benchmarks/bench_serving.py [--quick] [--out DIR]

The measuring code lives in the package (fastpeft/bench/serving.py) so `fastpeft bench` runs it too.
"""

import sys

from fastpeft.bench.runner import script_main

if __name__ == "__main__":
    sys.exit(script_main(["serving"], __doc__.split("\n\n")[0]))
