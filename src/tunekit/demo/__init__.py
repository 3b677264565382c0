"""A small, seeded structured-extraction task for showing what fine-tuning changes (see invoices.py)."""

from tunekit.demo.invoices import INSTRUCTION, generate_split, make_example, write_demo_dataset
from tunekit.demo.scoring import format_table, parse_json_output, score_predictions

__all__ = ["INSTRUCTION", "format_table", "generate_split", "make_example", "parse_json_output",
           "score_predictions", "write_demo_dataset"]
