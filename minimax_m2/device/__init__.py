"""The device program and what plans, checks and runs it: the units nkipy compiles (`program`), nkipy's
traced semantics on CPU, expert schedules, the memory plan, the roofline, the NeuronCore runner and its
check."""
