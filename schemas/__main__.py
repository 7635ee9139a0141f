from schemas.export import write_json_schemas

for path in write_json_schemas():
    print(path)
