"""Running a request: its settings and checks, typed row specs, where a row's layers come from,
one row, the row loop, the launcher (this process or a child), run directories, bench, convert.
"""
