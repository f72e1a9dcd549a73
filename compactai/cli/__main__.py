"""`python -m compactai.cli ...` runs the command line (same as the `compactai` script)."""

from compactai.cli import main

main()
