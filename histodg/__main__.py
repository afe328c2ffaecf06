"""`python -m histodg` (also what `torchrun -m histodg` starts)."""
from .cli import main

main(prog_name="histodg")
