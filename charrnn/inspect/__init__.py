"""Seeing inside a trained model: gradient flow through time (`gradients`), gate saturation
(`gates`), interpretable cells and surprisal (`cells`, `page`), and plots (`plots`).

Everything here reads a checkpoint and a text and never writes to either. The per-step
equations the analyses are built on are in `charrnn.inspect.equations`, written plainly.
"""
