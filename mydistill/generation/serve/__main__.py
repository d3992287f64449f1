"""``python -m mydistill.generation.serve``: see :mod:`mydistill.generation.serve`."""

from mydistill.generation.serve import main

if __name__ == "__main__":
    main()
