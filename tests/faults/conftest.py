import os
import sys

# The runtime tests' stages (rt_models) serve the fault tests too.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime"))
