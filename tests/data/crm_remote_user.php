<?php
// A stand-in for Dolibarr's "http" login mode in the end-to-end tests.
//
// Like htdocs/core/login/functions_http.php, it takes the user from
// $_SERVER['REMOTE_USER'] and treats an empty value as no user, with status
// 401. Otherwise the status is 200. Either way the JSON body lists the server
// variables that could carry a user name, so the tests can check where each
// value came from.
header('Content-Type: application/json');
header('Cache-Control: no-store');

$user = empty($_SERVER['REMOTE_USER']) ? '' : $_SERVER['REMOTE_USER'];
if ($user === '') {
    http_response_code(401);
}

$names = ['REMOTE_USER', 'PHP_AUTH_USER', 'AUTH_TYPE', 'SCRIPT_NAME', 'PATH_INFO', 'REQUEST_URI'];
foreach (array_keys($_SERVER) as $name) {
    if (strncmp($name, 'HTTP_', 5) === 0) {
        $names[] = $name;
    }
}
$variables = [];
foreach ($names as $name) {
    $variables[$name] = array_key_exists($name, $_SERVER) ? (string) $_SERVER[$name] : null;
}

echo json_encode([
    'remote_user' => $user,
    'server' => $variables,
    'cookies' => $_COOKIE,
], JSON_UNESCAPED_SLASHES), "\n";
