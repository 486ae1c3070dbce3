"""Text and image pre-processing shared by every model family (CLIP tokenizer, image transforms)."""
