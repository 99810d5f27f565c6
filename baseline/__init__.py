"""The full, unsplit model: command-line generation and the Gradio app on port 7861."""
