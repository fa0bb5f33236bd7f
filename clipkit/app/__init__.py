"""Applications built on the library: the HTTP search service and the emoji demo."""
