-- The trading database lives beside Dagster's in the same server.
CREATE DATABASE trading;
