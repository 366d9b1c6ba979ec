"""What both stages stand on: optimizer and schedule, autocast, weight reading, option fields.

``teacher/`` and ``student/`` import from here and never from each other. Nothing here imports
``teacher/``, ``student/`` or ``pipeline/``; ``deitpipe.common.options`` imports nothing heavy, so
the configs that declare their fields with it load without torch.
"""
