"""The daemon as a process of its host: systemd notifications and watchdog, the pid file that
`reload` signals, the file-descriptor budget."""
