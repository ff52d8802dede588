"""Everything that runs inside one trial. Only ``trainable.py`` may import Ray or MLflow."""
