"""The paper's tasks behind one interface; the registry in this file is the only place a task name is read."""
