"""Distillation study on the demo task (see src/tunekit/distill/experiment.py): python benchmarks/distill_demo.py"""

from tunekit.distill.experiment import main

if __name__ == "__main__":
    main()
