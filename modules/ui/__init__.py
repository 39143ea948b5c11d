"""The Gradio web UI: one module per tab, shared components, mounted on the server's FastAPI app."""
