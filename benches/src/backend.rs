//! The backend pods (datapath's far end): one nginx process serving both pod addresses,
//! a 6-byte body on `/small` and a 16 KiB file on `/16k`, keep-alive without a request cap.

use std::path::Path;

use crate::scenario::{
    BACKEND_H2C, BACKEND_V1, BACKEND_V2, LARGE_BODY_BYTES, LARGE_PATH, SMALL_PATH,
};

/// nginx.conf for a single-process nginx rooted at `dir` (`x-pod` names the answering pod so
/// the harness can check that both proxies split between the two).
pub fn nginx_conf(dir: &Path) -> String {
    let root = dir.display();
    let large = LARGE_PATH.trim_start_matches('/');
    single_process_nginx(
        dir,
        &format!(
            "    listen {BACKEND_V1};\n    listen {BACKEND_V2};\n    listen {BACKEND_H2C} http2;\n\
             \x20   root {root}/www;\n    add_header x-pod $server_addr always;\n\
             \x20   location = {SMALL_PATH} {{ default_type text/plain; return 200 \"hello\\n\"; }}\n\
             \x20   location = {LARGE_PATH} {{ default_type application/octet-stream; try_files /{large} =404; }}\n\
             \x20   location / {{ return 404; }}\n"
        ),
    )
}

/// One nginx process (no master, one worker), its pid, log and temp files under `dir`, no
/// access log and keep-alive without a request cap, serving one `server` block with `server`
/// inside it. Both load harnesses use it for their backends.
pub fn single_process_nginx(dir: &Path, server: &str) -> String {
    let dir = dir.display();
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 600s;\n\
         \x20 client_body_temp_path {dir}/tmp;\n  proxy_temp_path {dir}/tmp;\n  fastcgi_temp_path {dir}/tmp;\n\
         \x20 uwsgi_temp_path {dir}/tmp;\n  scgi_temp_path {dir}/tmp;\n\
         \x20 server {{\n{server}  }}\n}}\n"
    )
}

/// Writes the config, the 16 KiB file and the temp dir under `dir`; returns nginx's argv.
pub fn prepare(nginx: &Path, dir: &Path) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::write(
        dir.join("www").join(LARGE_PATH.trim_start_matches('/')),
        vec![b'x'; LARGE_BODY_BYTES],
    )?;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(dir))?;
    Ok(vec![
        nginx.display().to_string(),
        "-p".into(),
        dir.display().to_string(),
        "-e".into(),
        dir.join("nginx-error.log").display().to_string(),
        "-c".into(),
        conf.display().to_string(),
    ])
}
