//! The end of every write: the scale subresource, finalizers and deletion, the commit of a
//! changed object and its watch event.

use super::managed::*;
use super::*;

impl Store {
    pub(super) fn scale_response(
        &self,
        rt: &ResourceType,
        object: Value,
        sub: Sub,
    ) -> Result<Value> {
        if sub == Sub::Scale {
            self.scale_of(rt, &object)
        } else {
            Ok(object)
        }
    }

    /// The `autoscaling/v1 Scale` view of an object.
    pub fn scale_of(&self, rt: &ResourceType, object: &Value) -> Result<Value> {
        let Some(paths) = &rt.scale else {
            return Err(ApiError::not_found(
                rt,
                object["metadata"]["name"].as_str().unwrap_or_default(),
            ));
        };
        let meta = &object["metadata"];
        let mut status =
            json!({"replicas": get_path(object, &paths.status_replicas).as_i64().unwrap_or(0)});
        if let Some(sel) = &paths.label_selector
            && let Some(s) = get_path(object, sel).as_str()
        {
            status["selector"] = json!(s);
        }
        Ok(json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta["resourceVersion"],
                "creationTimestamp": meta["creationTimestamp"],
            },
            "spec": {"replicas": get_path(object, &paths.spec_replicas).as_i64().unwrap_or(0)},
            "status": status,
        }))
    }

    /// The object with the replicas of a written Scale.
    pub(super) fn object_with_scale(
        &self,
        rt: &ResourceType,
        old: &Value,
        scale: &Value,
    ) -> Result<Value> {
        let name = old["metadata"]["name"].as_str().unwrap_or_default();
        let Some(paths) = &rt.scale else {
            return Err(ApiError::not_found(rt, name));
        };
        let Some(replicas) = scale["spec"]["replicas"].as_i64() else {
            return Err(ApiError::invalid(
                rt,
                name,
                &["spec.replicas: Required value".into()],
            ));
        };
        if replicas < 0 {
            return Err(ApiError::invalid(
                rt,
                name,
                &[format!(
                    "spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
                )],
            ));
        }
        let mut new = old.clone();
        set_path(&mut new, &paths.spec_replicas, json!(replicas));
        new["metadata"]["resourceVersion"] = scale["metadata"]["resourceVersion"].clone();
        Ok(new)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_write(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        old: Value,
        mut new: Value,
        sub: Sub,
        ctx: &WriteCtx,
        entry: Value,
    ) -> Result<Value> {
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be an object",
            ));
        }
        if sub == Sub::Status {
            // Only the status is taken from a status write.
            let status = new.get("status").cloned();
            new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        } else if rt.status_subresource {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
            "managedFields",
        ] {
            match old["metadata"].get(field) {
                Some(v) => new["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        // Status writes are validated too (the whole object, so spec rules still hold).
        let errors = self.admit(rt, &mut new, Some(&old), ctx)?;
        if !errors.is_empty() {
            return Err(ApiError::invalid_fields(rt, name, &errors));
        }
        if sub != Sub::Status {
            Self::normalize_secret(rt, &mut new);
        }
        new = Self::with_type_meta(rt, new);
        if rt.generation && spec_part(rt, &new) != spec_part(rt, &old) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0);
            new["metadata"]["generation"] = json!(g + 1);
        }
        if Self::is_crd(rt) {
            Self::establish(&mut new);
            // The establishment times of an unchanged CRD stay as they were.
            if spec_part(rt, &new) == spec_part(rt, &old) {
                new["status"] = old["status"].clone();
            }
        }
        let mut entry = entry;
        let update = entry["operation"] == "Update";
        if update {
            // An update (PUT or patch) owns the fields it changed, besides those it owned
            // before; restating a value another manager set does not take it over.
            let mut fields = changed_fields(&entry["fieldsV1"], &old, &new);
            let same = |e: &&Value| {
                e["manager"] == entry["manager"]
                    && e["operation"] == "Update"
                    && e["subresource"] == entry["subresource"]
            };
            if let Some(prev) = old["metadata"]["managedFields"]
                .as_array()
                .and_then(|l| l.iter().find(same))
            {
                union_fields(&mut fields, &prev["fieldsV1"]);
            }
            entry["fieldsV1"] = fields;
        }
        transfer_ownership(&mut new, &old, &entry["fieldsV1"], &ctx.manager);
        // An update owns what it set, not what it removed.
        if update {
            retain_present(&mut entry["fieldsV1"], &new);
        }
        // An update that owns nothing has no entry, as on a real server.
        if !(update && entry["fieldsV1"].as_object().is_some_and(|f| f.is_empty())) {
            Self::record_manager(&mut new, entry);
        }
        if comparable(&new) == comparable(&old) {
            // A no-op write changes nothing, not even the resourceVersion.
            return Ok(old);
        }
        let finalizers_empty = new["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        if ctx.dry_run {
            return Ok(new);
        }
        if new["metadata"]["deletionTimestamp"].is_string() && finalizers_empty {
            return Ok(self.remove(rt, ns, name, new));
        }
        let out = self.commit(rt, ns, name, new, "MODIFIED");
        if Self::is_crd(rt) {
            self.registry.register_crd(&out);
        }
        Ok(out)
    }

    /// Removes an object for good (and what depends on it).
    pub(super) fn remove(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        object: Value,
    ) -> Value {
        let out = self.commit(rt, ns, name, object, "DELETED");
        if Self::is_crd(rt) {
            // The real server's `customresourcecleanup` finalizer deletes the instances first;
            // here they go at once, each with a DELETED event.
            let types = super::super::registry::types_of_crd(&out);
            if let Some(t) = types.first() {
                let keys: Vec<(String, String)> = self
                    .bucket(t)
                    .map(|b| b.keys().cloned().collect())
                    .unwrap_or_default();
                for (ons, oname) in keys {
                    if let Ok(o) = self.get(t, &ons, &oname) {
                        self.commit(t, &ons, &oname, o, "DELETED");
                    }
                }
            }
            self.registry.unregister_crd(&out);
        }
        out
    }

    /// `delete`: marks an object with finalizers, removes one without. Returns the object.
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        options: &Value,
        ctx: &WriteCtx,
    ) -> Result<Value> {
        let mut object = self.get(rt, ns, name)?;
        let pre = &options["preconditions"];
        if let Some(uid) = pre["uid"].as_str()
            && Some(uid) != object["metadata"]["uid"].as_str()
        {
            return Err(ApiError::conflict(rt, name));
        }
        if let Some(rv) = pre["resourceVersion"].as_str()
            && Some(rv) != object["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(rt, name));
        }
        if ctx.dry_run {
            return Ok(object);
        }
        if rt.group.is_empty() && rt.plural == "namespaces" {
            // Namespace contents are deleted (honouring their finalizers) and the namespace
            // goes at once, where a real cluster keeps it `Terminating` until it is empty.
            let types: Vec<ResourceType> = self
                .registry
                .all()
                .iter()
                .filter(|t| t.namespaced)
                .cloned()
                .collect();
            for t in types {
                let names: Vec<String> = self
                    .bucket(&t)
                    .map(|b| {
                        b.keys()
                            .filter(|(n, _)| n == name)
                            .map(|(_, o)| o.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for o in names {
                    let _ = self.delete(&t, name, &o, &Value::Null, ctx);
                }
            }
            return Ok(self.remove(rt, ns, name, object));
        }
        let has_finalizers = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if !has_finalizers {
            return Ok(self.remove(rt, ns, name, object));
        }
        if object["metadata"]["deletionTimestamp"].is_string() {
            return Ok(object);
        }
        object["metadata"]["deletionTimestamp"] = json!(now());
        object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        if rt.generation {
            let g = object["metadata"]["generation"].as_i64().unwrap_or(0);
            object["metadata"]["generation"] = json!(g + 1);
        }
        Ok(self.commit(rt, ns, name, object, "MODIFIED"))
    }
}
