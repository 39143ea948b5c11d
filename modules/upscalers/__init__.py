"""Model upscalers: ESRGAN / Real-ESRGAN / SRVGG networks, safe loading, tiling, Extras (a tensor layer)."""
