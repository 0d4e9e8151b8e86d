"""The format layer: pipeline, header, section plan, and the only container writer and reader."""
