"""What the two Gradio apps share (the split client's on 7860, the full model's on 7861): the generation and
latency tabs, the header, launching, and the charts. It imports no network client, so the full-model app runs
without one."""
