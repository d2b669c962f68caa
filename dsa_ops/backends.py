"""`python -m dsa_ops.backends`: which implementation each op uses on this machine, and why."""
import dsa_ops
from dsa_ops.dispatch import report

if __name__ == "__main__":
    print(report())
