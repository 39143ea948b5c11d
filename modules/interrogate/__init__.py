"""Interrogation: a prompt from an image (A1111's "Interrogate CLIP" and "Interrogate DeepBooru")."""
