"""charrnn: character-level recurrent language models in numpy."""

__version__ = "1.0.0"
