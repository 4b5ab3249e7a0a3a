pytest_plugins = ["tests.helpers", "tests.vlm_fixtures"]
