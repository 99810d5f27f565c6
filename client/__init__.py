"""The split client: embeddings, bottom and top blocks here, the trunk on a server; CLI and Gradio app."""
