"""`kiln bench`: kiln against the engines people use today, on the same prompts and token
counts, each engine in its own process, with roofline figures and reports."""
