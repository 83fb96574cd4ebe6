"""User-facing programs: the `nanochat` command, the server, the Gradio app, Hub publishing."""
