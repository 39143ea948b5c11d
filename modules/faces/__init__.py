"""Face restoration: RetinaFace detection, alignment, GFPGAN / CodeFormer / RestoreFormer, paste-back."""
