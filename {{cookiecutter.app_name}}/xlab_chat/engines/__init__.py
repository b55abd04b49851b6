"""Engines that turn a chat into streamed text."""
