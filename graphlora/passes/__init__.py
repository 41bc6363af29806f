"""graphlora graph passes (installed as graphlora.passes)."""
