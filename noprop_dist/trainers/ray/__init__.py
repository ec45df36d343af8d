"""The Ray trainer: the coordinator (``coordinator``), its pure replica planner (``plan``) and
placement (``placement``), and the connection to a cluster (``cluster``). Importing this
package imports no Ray."""
