"""Plans from numbers: the stage plan (steps per stage, teacher depth, LR at a step; stages.py) and the
`dbot-plan` memory (memory.py) and time (timeplan.py) planners. Pure functions of the config."""
