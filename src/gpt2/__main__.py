"""`python -m gpt2 ...` (and `torchrun -m gpt2 ...`) runs the CLI."""

from gpt2.cli import main

if __name__ == "__main__":
    main()
