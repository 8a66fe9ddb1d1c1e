"""Offline side: the Co-DINO model in PyTorch, checkpoint loading, export and engine builds."""
