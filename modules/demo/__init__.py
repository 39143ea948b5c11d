"""The bundled demo model: a procedural captioned-shapes dataset, its classifier, training and export."""
from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "Stable-diffusion" / "atelier-demo-shapes.safetensors"
DEMO_RESOLUTION = 128  # what the demo model was trained at
