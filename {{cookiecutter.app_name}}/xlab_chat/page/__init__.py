"""The gradio chat page: layout, texts in Chinese and English, and history normalisation."""
