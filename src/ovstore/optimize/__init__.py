"""Token optimization from cached features (learned class embeddings); see the roadmap."""

__all__: list[str] = []
